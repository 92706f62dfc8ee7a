"""Models: where a Chatterbox model comes from and how its S3Gen stage is called.

Sources of every family (tiny, deep-narrow and full-size random weights, checkpoint folders,
pretrained), the reference voice, checkpoints the project writes, and the S3Gen flow/vocoder calls
with fixed window shapes (``FlowPlan``). May import ``core`` only.
"""
