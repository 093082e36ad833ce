"""The ModelMerge operator (kopf): reconciles each ModelMerge custom resource into one merge Job and reports the
Job's progress back into the resource's status. It imports no torch: the merge itself runs in the Job's pod."""
