"""The HTTP plumbing of the service, one job per module, none with side effects on import:

    errors   ClientError and the one exception handler that answers it (4xx/503 JSON)
    auth     the API key check (Authorization: Bearer <key>, compared in constant time)
    limits   requests at once, the worker's budget of request-body bytes (ASGI middleware),
             reading a body within max_request_bytes, max_images_per_request
    forms    reading a multipart request (or, through jsonbody, a JSON one): images, metadata, k
    jsonbody JSON bodies: base64 images (never URLs), the OpenAI /v1/embeddings request/answer
    fields   the index's request fields: search filters, a stored item's id, replace, deletes
    decode   decoding the uploaded images in a thread pool, naming each bad file
    schemas  the response models, the OpenAPI request bodies and error table, JSON encoding
    app      create_app(config): the FastAPI app that embedserve.service mounts
    index_api    what the index's endpoints do (IndexEndpoints: search, add, delete, items,
                 thumbnails, labels), one per worker
    index_routes the index's routes and their OpenAPI documentation

embedserve.service holds the BentoML service class and the model's endpoints, which use these,
and adds the index's routes.
"""
