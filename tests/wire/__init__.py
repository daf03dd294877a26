"""Local servers that speak real wire formats, so tests can drive the real SDKs over loopback."""
