/**
 * One entry of the transition stream as a consumer reads it (docs/contract.md, "The transition stream"): the parsed
 * entry (`TransitionEntry`, `parseEntry`) and the schema of its fields as the fleet writes them.
 */
import { z } from 'zod';
import { ACTOR_PATTERN, EVENT_ID_PATTERN } from '../events/schemas';
import { DEPLOYMENT_STATES } from '../machine';

/** One stream entry, parsed (docs/contract.md, "The transition stream"). */
export interface TransitionEntry {
  /** the Redis stream entry id */
  readonly streamId: string;
  readonly type: 'state_transition';
  readonly transitionId: string;
  readonly deploymentId: string;
  /** empty when none */
  readonly attemptId: string;
  /** empty for creation */
  readonly from: string;
  readonly to: string;
  readonly version: number;
  readonly reason: string;
  readonly eventId: string;
  readonly at: string;
  /** who caused it: an API token's name, `sweep`, or the producer's `actor` (empty in entries older than the field) */
  readonly actor: string;
  /**
   * The W3C trace context of the relay's `publish` span for this entry, when tracing was on where it was written
   * (docs/architecture.md, "Tracing"); the handler runs in a `handle transition` span continuing it
   */
  readonly traceparent?: string;
}

/** A UUID as the fleet writes it on the stream (PostgreSQL's text form: lower case). */
const STREAM_UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/**
 * One stream entry's fields as the fleet writes them (docs/contract.md, "The transition stream"): all strings. The
 * source of `docs/schemas/stream-entry.json` (`npm run schemas`), for consumers in other languages. Fields it does
 * not name are allowed (strings), since the contract may gain fields. `parseEntry` does not use it: a consumer must
 * not stop on an entry it can read, and entries older than a field lack it.
 */
export const STREAM_ENTRY_SCHEMA = z
  .object({
    type: z.literal('state_transition'),
    transitionId: z.string().min(1).meta({ description: 'the history row id: opaque, unique per transition' }),
    deploymentId: z.string().regex(STREAM_UUID),
    attemptId: z.union([z.literal(''), z.string().regex(STREAM_UUID)]).meta({ description: 'empty when none' }),
    from: z.enum(['', ...DEPLOYMENT_STATES]).meta({ description: 'empty for creation' }),
    to: z.enum(DEPLOYMENT_STATES),
    version: z
      .string()
      .regex(/^[1-9][0-9]*$/)
      .meta({
        description:
          "the deployment's version after the transition (decimal): per deployment, entries arrive in increasing version; drop one whose version you have seen",
      }),
    reason: z.string().min(1),
    eventId: z.string().regex(EVENT_ID_PATTERN),
    at: z.iso.datetime({ offset: true }).meta({ description: 'when the transition happened (ISO 8601, the fleet clock)' }),
    actor: z
      .string()
      .regex(ACTOR_PATTERN)
      .optional()
      .meta({ description: "the API token's name, `sweep`, or the producer's `actor`; absent from entries written before the field existed" }),
    traceparent: z
      .string()
      .regex(/^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$/)
      .optional()
      .meta({ description: 'W3C trace context of the transition, when tracing is on' }),
  })
  .catchall(z.string());

export function parseEntry(streamId: string, fields: readonly string[]): TransitionEntry {
  const f: Record<string, string> = {};
  for (let i = 0; i + 1 < fields.length; i += 2) f[fields[i] ?? ''] = fields[i + 1] ?? '';
  return {
    streamId,
    type: 'state_transition',
    transitionId: f.transitionId ?? '',
    deploymentId: f.deploymentId ?? '',
    attemptId: f.attemptId ?? '',
    from: f.from ?? '',
    to: f.to ?? '',
    version: Number(f.version ?? 0),
    reason: f.reason ?? '',
    eventId: f.eventId ?? '',
    at: f.at ?? '',
    actor: f.actor ?? '',
    ...(f.traceparent === undefined ? {} : { traceparent: f.traceparent }),
  };
}
