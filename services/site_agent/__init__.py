"""The site agent: runs on a cluster, drives its vLLM instances, streams tokens back via Redis."""
