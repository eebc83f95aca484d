"""The door jobs come in by: submission, conditioning images fetched (under the fetch policy) and stored once."""
