"""The Litestar API: REST under /api/v1, live updates on /ws, health and the dashboard."""
