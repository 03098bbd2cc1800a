"""Walking models: sites, adapters and the scan that finds them."""
