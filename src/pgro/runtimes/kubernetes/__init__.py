"""The Kubernetes runtime: operator controllers and the objects they create."""
