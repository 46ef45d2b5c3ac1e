"""Network shell: aiohttp links, zeroconf discovery, static peers."""
