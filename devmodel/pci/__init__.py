"""devmodel/pci."""
