"""The callback service: asynchronous functions' results settle their jobs here.

``service`` judges a callback and settles its job (fenced); ``server`` serves it
over HTTP; ``parsing`` reads the three shapes a callback comes in; ``tokens``
signs and checks the capability in each callback URL; ``deadlines`` fails the
deferred jobs whose callback never came.
"""
