"""The EnSync-compatible server: WebSocket protocol, admin API, configuration."""
