"""Tests against a real kube-apiserver, etcd and kube-controller-manager, with a fake node."""
