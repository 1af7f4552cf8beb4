"""vfio_user."""
