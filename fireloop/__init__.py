"""The `fireloop` command line: the top of the stack, allowed to import every layer."""
