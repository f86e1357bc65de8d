"""kvpool Kubernetes operator."""
