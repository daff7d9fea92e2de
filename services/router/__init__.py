"""The router: places each request on a live site with its model hot, from site heartbeats."""
