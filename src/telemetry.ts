/**
 * Tracing (docs/architecture.md, "Tracing"): OpenTelemetry spans from an event's enqueue through its job, its
 * transition and the relay's publish to a consumer's handler, one trace per event.
 *
 * Off unless the standard `OTEL_*` variables ask for it (src/config.ts compiles them into `TracingSettings`). Off,
 * nothing of the SDK is loaded: `startTracing` returns null without importing anything, BullMQ gets no telemetry
 * option, and the spans of our own code go to `@opentelemetry/api`'s no-op tracer, or are not started at all (the
 * hot paths start a span only under a context that already has one). On, the SDK modules are imported here, with
 * a dynamic import, and nowhere else.
 *
 * The helpers below are what the rest of the code uses: `tracer()`, `inSpan()`, and the W3C `traceparent` string
 * of a span context (written into the outbox row, carried on the stream entry, read back by `TransitionConsumer`).
 */
import { context, isSpanContextValid, propagation, ROOT_CONTEXT, SpanStatusCode, trace, TraceFlags } from '@opentelemetry/api';
import type { Attributes, Context, Span, SpanContext, SpanKind, Tracer } from '@opentelemetry/api';
import type { Telemetry as BullTelemetry } from 'bullmq';
import type { SpanExporter } from '@opentelemetry/sdk-trace-node';
import type { Logger } from './log';

/** The instrumentation scope of our own spans. */
export const TRACER_NAME = 'lifecycle-fleet';

/** What `src/config.ts` compiles from the `OTEL_*` variables (docs/contract.md, "Configuration"). */
export interface TracingSettings {
  /** tracing on: `OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT` set or `OTEL_TRACES_EXPORTER=otlp`, unless `OTEL_SDK_DISABLED=true` or `OTEL_TRACES_EXPORTER=none` */
  readonly enabled: boolean;
  /** `OTEL_SERVICE_NAME` (default `lifecycle-fleet`) */
  readonly serviceName: string;
  /**
   * Where spans go (OTLP over HTTP, JSON): `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` as is, else
   * `OTEL_EXPORTER_OTLP_ENDPOINT` + `/v1/traces`, else `http://localhost:4318/v1/traces`
   */
  readonly tracesUrl: string;
  /**
   * `FLEET_TRACE_BENCH=1`, a bench hook (bench/README.md): tracing on, to an in-process exporter that counts the
   * spans and drops them, so that the bench measures what tracing costs the process without a collector
   */
  readonly benchExporter: boolean;
}

export const TRACING_OFF: TracingSettings = Object.freeze({
  enabled: false,
  serviceName: 'lifecycle-fleet',
  tracesUrl: 'http://localhost:4318/v1/traces',
  benchExporter: false,
});

/** Test hooks of `startTracing`. */
export interface TracingStartOptions {
  /** export every finished span at once to this exporter (a `SimpleSpanProcessor`), instead of OTLP in batches */
  readonly exporter?: SpanExporter;
}

/** Tracing, started: the SDK registered as the process's global tracer provider. */
export interface Tracing {
  /** BullMQ's `telemetry` option for every Queue and Worker of the process (bullmq-otel) */
  readonly bullmq: BullTelemetry;
  /** spans exported so far (the bench's counting exporter only; 0 otherwise) */
  exportedSpans(): number;
  /** flushes what is buffered and unregisters the SDK; safe to call twice */
  close(): Promise<void>;
}

/** The one started in this process (the SDK registers globally, so there is at most one). */
let started: { readonly tracing: Tracing; users: number } | null = null;

/**
 * Starts tracing when `settings` ask for it (or a test hands an exporter); returns null, having loaded nothing,
 * otherwise. A second start while one is running shares it (each caller closes its own; the last close flushes).
 */
export async function startTracing(settings: TracingSettings, logger: Logger, options: TracingStartOptions = {}): Promise<Tracing | null> {
  if (!settings.enabled && options.exporter === undefined) return null;
  if (started !== null) return share(started);
  const [sdk, { resourceFromAttributes }, { ATTR_SERVICE_NAME }, { BullMQOtel }] = await Promise.all([
    import('@opentelemetry/sdk-trace-node'),
    import('@opentelemetry/resources'),
    import('@opentelemetry/semantic-conventions'),
    import('bullmq-otel'),
  ]);
  let exported = 0;
  let processor;
  if (options.exporter !== undefined) {
    processor = new sdk.SimpleSpanProcessor(options.exporter);
  } else if (settings.benchExporter) {
    const counting: SpanExporter = {
      export: (spans, done) => {
        exported += spans.length;
        done({ code: 0 });
      },
      shutdown: async () => undefined,
    };
    processor = new sdk.BatchSpanProcessor(counting);
  } else {
    const { OTLPTraceExporter } = await import('@opentelemetry/exporter-trace-otlp-http');
    processor = new sdk.BatchSpanProcessor(new OTLPTraceExporter({ url: settings.tracesUrl }));
  }
  const provider = new sdk.NodeTracerProvider({
    resource: resourceFromAttributes({ [ATTR_SERVICE_NAME]: settings.serviceName }),
    spanProcessors: [processor],
  });
  // the AsyncLocalStorage context manager, the W3C trace-context propagator (BullMQ's job metadata uses it) and the
  // global tracer provider
  provider.register();
  const bullmq: BullTelemetry = new BullMQOtel({ tracerName: 'bullmq' });
  let closing: Promise<void> | null = null;
  const tracing: Tracing = {
    bullmq,
    exportedSpans: () => exported,
    close: () =>
      (closing ??= (async () => {
        started = null;
        try {
          await provider.shutdown();
        } catch (err) {
          logger.warn({ reason: err instanceof Error ? err.message : String(err) }, 'tracing: spans not flushed at shutdown');
        }
        trace.disable();
        context.disable();
        propagation.disable();
        if (settings.benchExporter) logger.info({ spansExported: exported }, 'tracing stopped');
      })()),
  };
  started = { tracing, users: 0 };
  const where =
    options.exporter !== undefined
      ? 'a test exporter'
      : settings.benchExporter
        ? "the bench's counting exporter (FLEET_TRACE_BENCH)"
        : originOf(settings.tracesUrl);
  logger.info({ serviceName: settings.serviceName, exporter: where }, 'tracing on');
  return share(started);
}

function share(entry: { readonly tracing: Tracing; users: number }): Tracing {
  entry.users++;
  let closed = false;
  return {
    bullmq: entry.tracing.bullmq,
    exportedSpans: () => entry.tracing.exportedSpans(),
    close: async () => {
      if (closed) return;
      closed = true;
      if (--entry.users === 0) await entry.tracing.close();
    },
  };
}

/** A URL's scheme, host and path, never its credentials or query (logs carry no secrets). */
function originOf(url: string): string {
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.host}${u.pathname}`;
  } catch {
    return '(unparsable URL)';
  }
}

/** Our tracer: the SDK's while tracing is on, the API's no-op tracer otherwise. */
export function tracer(): Tracer {
  // asked each time rather than kept: a tracer obtained before a (re)registration would keep the old provider's
  return trace.getTracer(TRACER_NAME);
}

/** Whether `ctx` carries a span, i.e. whether the work under it is traced at all. */
export function isTraced(ctx: Context): boolean {
  return trace.getSpanContext(ctx) !== undefined;
}

/**
 * Runs `fn` in a span named `name`, child of `parent`, and ends the span when it settles (an error is recorded on
 * it). With `parent` null the work is not traced: `fn` runs as it is, and no span is made.
 */
export async function inSpan<T>(
  name: string,
  parent: Context | null,
  fn: (span: Span | null) => Promise<T>,
  options: { readonly attributes?: Attributes; readonly kind?: SpanKind } = {},
): Promise<T> {
  if (parent === null) return fn(null);
  const span = tracer().startSpan(name, options, parent);
  try {
    return await context.with(trace.setSpan(parent, span), () => fn(span));
  } catch (err) {
    failSpan(span, err);
    throw err;
  } finally {
    span.end();
  }
}

/** Marks a span failed with the error. */
export function failSpan(span: Span, err: unknown): void {
  span.recordException(err instanceof Error ? err : String(err));
  span.setStatus({ code: SpanStatusCode.ERROR, message: err instanceof Error ? err.message : String(err) });
}

/** A span context as a W3C `traceparent` (`00-<trace id>-<span id>-<flags>`); null for an invalid (no-op) one. */
export function formatTraceparent(spanContext: SpanContext): string | null {
  if (!isSpanContextValid(spanContext)) return null;
  const flags = (spanContext.traceFlags & TraceFlags.SAMPLED).toString(16).padStart(2, '0');
  return `00-${spanContext.traceId}-${spanContext.spanId}-${flags}`;
}

const TRACEPARENT = /^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?$/;

/** A W3C `traceparent` as the remote parent context it names; null when it is missing or malformed. */
export function traceparentContext(traceparent: string | undefined): Context | null {
  if (traceparent === undefined) return null;
  const m = TRACEPARENT.exec(traceparent.trim());
  if (m === null || m[1] === 'ff' || (m[1] === '00' && m[5] !== undefined)) return null;
  const spanContext: SpanContext = { traceId: m[2] ?? '', spanId: m[3] ?? '', traceFlags: parseInt(m[4] ?? '0', 16), isRemote: true };
  if (!isSpanContextValid(spanContext)) return null;
  return trace.setSpanContext(ROOT_CONTEXT, spanContext);
}
