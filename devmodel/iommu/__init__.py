"""devmodel/iommu."""
