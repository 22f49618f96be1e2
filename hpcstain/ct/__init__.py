"""The CT → generator contract, in one place.

Everything a raw CT value goes through before a generator sees it lives here, for the 2D
slides (predict, evaluate, training) and the volume engine (stain, fuse, distill) alike:

* :mod:`.levels`: the raw bone and background levels of a CT (the one CT-only estimator),
  and the level types: :class:`~.levels.RawLevels` (what a CT holds) and
  :class:`~.levels.TargetLevels` (what a checkpoint was trained on, §2.5);
* :mod:`.cupping`: the self-calibrated radial cupping correction;
* :mod:`.signed`: raw → 16-bit target scale → the generator's signed range [-1, 1] (and back);
* :mod:`.conventions`: what a checkpoint records about its CT input;
* :mod:`.outside`: the sample/outside test on raw CT;
* :mod:`.prepare`: read → correct → smooth → level → signed range → context slices.

Nothing here imports the volume engine, the models or the training code.
"""
