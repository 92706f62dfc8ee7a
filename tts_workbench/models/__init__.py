"""Models: where a Chatterbox model comes from and how its S3Gen stage is called.

``sources`` (``load_model``) opens every source: a random-weight build of any family
(``builders``, with the text front ends of ``frontends``), a checkpoint folder (``checkpoints``)
or pretrained weights. Beside them: the reference voice (``reference``) and the S3Gen
flow/vocoder calls with fixed window shapes (``vocode``, ``FlowPlan``). May import ``core`` only.
"""
