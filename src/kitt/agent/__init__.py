"""The agent daemon that runs on every GPU machine."""
