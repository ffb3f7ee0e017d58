"""Partner Center webhooks: signature verification and the receiver the plugin mounts on the API server."""
