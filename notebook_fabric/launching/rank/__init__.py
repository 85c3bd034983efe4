"""The rank side: what runs inside a rank process, from its entry point (:mod:`.main`) to ``os._exit``.

Nothing in the notebook imports these modules (the starters only hand a new rank :func:`.main.rank_entry`).
"""
