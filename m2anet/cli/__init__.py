"""The `m2a-*` commands: each parses its arguments, calls the library, prints and sets the exit code."""
