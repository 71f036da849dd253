"""The HTTP plumbing of the service, one job per module, none with side effects on import:

    errors   ClientError and the one exception handler that answers it (4xx/503 JSON)
    auth     the API key check (Authorization: Bearer <key>, compared in constant time)
    limits   requests at once and the worker's budget of request-body bytes (ASGI middleware)
    forms    reading a multipart request: images, text fields, metadata, k
    decode   decoding the uploaded images in a thread pool, naming each bad file
    schemas  the response models, the OpenAPI request bodies and error table, JSON encoding
    app      create_app(config): the FastAPI app that embedserve.service mounts

embedserve.service holds the BentoML service class and its endpoints, which use these.
"""
