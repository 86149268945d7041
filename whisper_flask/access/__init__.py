"""Who may do what: API keys, the failed-key throttle, signed download links."""
