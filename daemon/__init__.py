"""The pocketd daemon: config, policy, scheduler, control socket and CLI. Never imports torch."""
