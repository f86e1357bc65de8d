"""The pod-injection webhook: `patch` decides (pure), `vllm_command` reads command lines (pure),
`certs` keeps the serving certificate, `server` serves HTTPS, `cluster` reads pools and keeps the CA
in the MutatingWebhookConfiguration."""
