/**
 * The API's own description (docs/contract.md, "HTTP"): the OpenAPI document at OPENAPI_PATH, generated from the
 * routes' schemas (route-options.ts), and Swagger UI over it at DOCS_PATH; both need `read` like the API's GETs.
 * Bull Board's routes stay out of it.
 */
import * as fs from 'node:fs';
import * as path from 'node:path';
import swagger, { type SwaggerTransformObject } from '@fastify/swagger';
import swaggerUi from '@fastify/swagger-ui';
import type { FastifyInstance, FastifyPluginAsync } from 'fastify';
import { jsonSchemaTransform, jsonSchemaTransformObject } from 'fastify-type-provider-zod';
import { repoRoot } from '../../util';

/** The OpenAPI document of the API, generated from the routes' schemas. */
export const OPENAPI_PATH = '/openapi.json';
/** Swagger UI over that document. */
export const DOCS_PATH = '/docs';

type OpenApiDocument = ReturnType<SwaggerTransformObject>;

/**
 * The document without the named schemas nothing refers to: the type provider names every schema with an `id` twice,
 * as the input and as the output twin, and each is used one way only.
 */
function withoutUnusedSchemas(document: OpenApiDocument): OpenApiDocument {
  // an OpenAPI 3 document (the only kind this server asks for): its named schemas are under components
  const components = (document as { components?: { schemas?: Record<string, unknown> } }).components;
  const schemas = components?.schemas ?? {};
  const used = new Set<string>();
  const visit = (value: unknown): void => {
    for (const [, id] of JSON.stringify(value).matchAll(/"#\/components\/schemas\/([^"]+)"/g)) {
      if (id === undefined || used.has(id)) continue;
      used.add(id);
      visit(schemas[id]);
    }
  };
  visit({ ...document, components: { ...components, schemas: {} } });
  const kept = Object.fromEntries(Object.entries(schemas).filter(([id]) => used.has(id)));
  return { ...document, components: { ...components, schemas: kept } } as OpenApiDocument;
}

function packageVersion(): string {
  const { version } = JSON.parse(fs.readFileSync(path.join(repoRoot(), 'package.json'), 'utf8')) as { version?: unknown };
  return typeof version === 'string' ? version : '0.0.0';
}

/** Starts gathering the document from the routes as they are added: before any of them. */
export async function gatherDocument(app: FastifyInstance): Promise<void> {
  await app.register(swagger, {
    openapi: {
      openapi: '3.1.0',
      info: {
        title: 'lifecycle-fleet',
        version: packageVersion(),
        description: 'The HTTP API of the deployment lifecycle fleet (docs/contract.md, "HTTP"). Errors are `{error: {code, message}}`.',
      },
      components: {
        securitySchemes: {
          bearer: {
            type: 'http',
            scheme: 'bearer',
            description:
              'An API token (`fleet token create`); each operation names the scope it needs (`x-scope`). Without a tokens file (loopback only) the API is open.',
          },
        },
      },
      security: [{ bearer: [] }],
    },
    transform: jsonSchemaTransform,
    transformObject: (document) => withoutUnusedSchemas(jsonSchemaTransformObject(document)),
  });
}

/** The document and its UI, after the routes it describes. */
export const docsRoutes: FastifyPluginAsync = async (app) => {
  app.get(OPENAPI_PATH, { config: { scope: 'read' }, schema: { hide: true } }, async () => app.swagger());
  await app.register(async (ui) => {
    // every route of the UI, its assets included, needs what the document needs
    ui.addHook('onRoute', (options) => {
      options.config = { ...options.config, scope: 'read' };
    });
    await ui.register(swaggerUi, {
      routePrefix: DOCS_PATH,
      // nothing from elsewhere: the assets come from the package, and no online validator is asked
      validatorUrl: false,
      staticCSP:
        "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; object-src 'none'; frame-ancestors 'none'",
      uiConfig: { showExtensions: true, displayRequestDuration: true },
    });
  });
};
