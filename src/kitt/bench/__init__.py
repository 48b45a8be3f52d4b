"""`kitt bench`: the serving benchmark, its engines and its data."""
