"""The asynchronous parameter server on mpi4py (``mode = "async"``): ``driver`` runs a job,
``plan`` fixes what it does, ``server``/``worker`` exchange ``protocol`` messages, ``optim`` is
the servers' SGD. Not a Backend: workers compute with the framework's ``local`` backend."""
