"""The service files (package data): a systemd user unit, a termux-services (runit) service, a Termux:Boot script."""
