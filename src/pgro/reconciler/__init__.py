"""The reconciler shell and the effects interface every runtime implements."""
