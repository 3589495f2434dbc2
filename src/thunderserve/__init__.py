"""ThunderServe."""
