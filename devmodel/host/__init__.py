"""devmodel/host."""
