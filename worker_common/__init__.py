"""What both worker kinds share: settings, the asyncio engine loop, Redis registration, metrics."""
