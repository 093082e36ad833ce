"""The streaming merge engine that runs in the merge container (`modelmerge merge`)."""
