"""Warm-starting: plan where every target key's value comes from, then load it all or nothing.

``keymap`` (names) and ``transforms`` (typed value steps, with the shape adapters of ``adapt``)
feed ``match`` (pairing by structure) and ``plan`` (the `LoadPlan`); ``execute`` checks, stages
and commits a plan; ``load`` holds the front doors `load_`, `build` and `transfer`. Nothing is
imported here: ``import weightsmith`` stays free of torch.
"""
