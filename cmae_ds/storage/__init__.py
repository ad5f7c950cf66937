"""Writing to disk without leaving half a file: temp-then-rename, run-folder checks."""
