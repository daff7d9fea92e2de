"""Who may ask for what: shared by the gateway (HTTP) and the router (`first.ingress`)."""
