/**
 * The transition service's spans (docs/architecture.md, "Tracing"). An event is traced only when it arrives under a
 * span (the job's, from BullMQ's telemetry): then it gets a `transition <name>` span whose W3C context is written
 * into its outbox row (`traceparent`), so the relay's publish and a consumer's handler continue its trace. An event
 * that arrives under no span makes no span and writes no `traceparent`: with tracing off, the cost is one lookup.
 *
 * A group-commit batch writes many events in one statement, so its statements belong to no single event's trace:
 * the batch gets a span of its own (`transition batch`, a new trace, its `sql snapshot` and `sql write` under it)
 * linked to every event's `transition` span, and each of those records the batch (attributes and a link back).
 */
import { ROOT_CONTEXT, trace, type Context, type Span } from '@opentelemetry/api';
import { failSpan, formatTraceparent, isTraced, tracer } from '../../telemetry';
import type { LifecycleEvent } from '../../events/schemas';
import type { ApplyResult } from './outcomes';

/** One event's span, and the context its statements (on the one-event path) run under. */
export interface EventTrace {
  readonly span: Span;
  readonly context: Context;
  /** the span's W3C context, written into the outbox row */
  readonly traceparent: string | null;
}

export function eventAttributes(event: LifecycleEvent): Record<string, string> {
  return {
    'fleet.event.name': event.name,
    'fleet.event.id': event.eventId,
    'fleet.deployment.id': event.data.deploymentId,
    ...('attemptId' in event.data ? { 'fleet.attempt.id': event.data.attemptId } : {}),
  };
}

/** Starts the event's `transition <name>` span under `parent` (default: the active context), if that is traced. */
export function startEventTrace(event: LifecycleEvent, parent: Context): EventTrace | null {
  if (!isTraced(parent)) return null;
  const span = tracer().startSpan(`transition ${event.name}`, { attributes: eventAttributes(event) }, parent);
  return { span, context: trace.setSpan(parent, span), traceparent: formatTraceparent(span.spanContext()) };
}

/** Ends the event's span with its outcome. */
export function endEventTrace(t: EventTrace | null, result: PromiseSettledResult<ApplyResult>): void {
  if (t === null) return;
  if (result.status === 'fulfilled') {
    const r = result.value;
    t.span.setAttribute('fleet.outcome', r.outcome);
    if (r.outcome === 'applied') t.span.setAttributes({ 'fleet.version': r.version, 'fleet.reason': r.reason, 'fleet.to': r.to });
    else if (r.outcome === 'noop') t.span.setAttribute('fleet.reason', r.reason);
    else t.span.setAttribute('fleet.rejection', r.code);
  } else {
    failSpan(t.span, result.reason);
  }
  t.span.end();
}

/**
 * A batch's span: a trace of its own, linked to each traced event's span, each of which gets a link back and the
 * batch's ids as attributes. Null (and nothing made) when no event of the batch is traced.
 */
export function startBatchTrace(traces: ReadonlyArray<EventTrace | null>, size: number): { readonly span: Span; readonly context: Context } | null {
  const traced = traces.filter((t): t is EventTrace => t !== null);
  if (traced.length === 0) return null;
  const span = tracer().startSpan(
    'transition batch',
    { root: true, attributes: { 'fleet.batch.size': size }, links: traced.map((t) => ({ context: t.span.spanContext() })) },
    ROOT_CONTEXT,
  );
  const { traceId, spanId } = span.spanContext();
  for (const t of traced) {
    t.span.addLink({ context: span.spanContext() });
    t.span.setAttributes({ 'fleet.batch.trace_id': traceId, 'fleet.batch.span_id': spanId, 'fleet.batch.size': size });
  }
  return { span, context: trace.setSpan(ROOT_CONTEXT, span) };
}
