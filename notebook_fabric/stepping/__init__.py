"""Stepping into a rank: ``breakpoint()``, ``pdb`` and ``input()`` in a rank, answered from the notebook.

A rank that asks for a line sends an :class:`~.messages.InputRequest` on the event channel; the
notebook's :class:`~.prompt_server.PromptServer` (driven by the run loop, in the caller's thread)
asks the user through ``input()`` (the kernel's stdin in a notebook, the terminal in a script)
and sends the answer back on the control channel as an :class:`~.messages.InputReply`. Ranks at
a prompt are served one at a time, in rank order, and shown as "in the debugger", never as a
stall.

- :mod:`.messages`: what travels (both directions), and :class:`~.messages.StdinUnavailableError`;
- :mod:`.rank_prompts`: in a rank: ``input()``, ``sys.stdin`` and pdb's terminal, all asking the notebook;
- :mod:`.rank_pdb`: in a rank: the ``pdb.Pdb`` every ``breakpoint()`` gets (prompt ``(Pdb rank N)``);
- :mod:`.post_mortem`: in a rank: pdb on a failure's frame (``%fabric debug``, ``launch(..., post_mortem=True)``);
- :mod:`.prompt_server`: in the notebook: who is served, asking, pausing the stall clock and the timeout.
"""
