"""The client wing: everything that runs in the user's process (pools, the driver, handles).

Nothing here runs on a Dask worker; what runs there lives in :mod:`zdq.broker`, :mod:`zdq.consumer`
and :mod:`zdq.relay`. What travels between the two sides is :mod:`zdq.codec`'s.
"""
