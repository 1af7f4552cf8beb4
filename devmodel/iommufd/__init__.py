"""devmodel/iommufd."""
