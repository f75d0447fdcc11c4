"""I/O around the sans-IO codec: things that run programs or touch files for it."""
