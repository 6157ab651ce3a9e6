"""The demo: a generated corpus and a small Base/SFT pair trained on this CPU in minutes.

``corpus.make_corpus`` / ``corpus.write_corpus`` make the data; ``pair.build_demo_pair`` trains
(or finds cached) the pair; ``run.run_demo`` (``sftscope demo``) runs every analysis on it.
Import from the submodules: importing this package loads no heavy dependency.
"""
