"""What operators see: logs (and, later, metrics and traces) that never carry a secret."""
