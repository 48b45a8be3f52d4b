"""The control plane: REST API, storage, and the background reaper."""
