"""devmodel/viommu."""
