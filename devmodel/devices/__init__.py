"""devmodel/devices."""
