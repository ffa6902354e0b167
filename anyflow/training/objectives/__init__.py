"""The objectives that made the AnyFlow weights, as functions next to the samplers they mirror.

    flow_map.py               stage 0, the teacher: flow_matching_loss; stage 1, the student: FlowMapLoss
    student_rollout.py        stage 2: rollout, the student's few-step video with one step that keeps gradients
    distribution_matching.py  stage 2: dmd_loss (the generator) and fake_score_loss (the fake score)
    timesteps.py              the draws, noise and weights they share
    velocity.py               how they call a model (bidirectional or FAR)

docs/TRAINING.md holds the math; each function's docstring says which equation it computes.
"""
