/**
 * The endpoints of the "fleet scale" scenario, shared by the scenario (which seeds their URLs and counts which are
 * fresh) and bench/fixtures/scale-endpoints (which serves them): endpoint `n` (1..N) is
 * `http://127.0.0.1:<ports[n % ports.length]>/e/<n>`, probed at `/e/<n>/ready`. A deterministic fraction never
 * answers: `isSilent(n, fraction)`, spread evenly over n (Weyl sequence), the same in both processes.
 */

/** The golden-ratio Weyl sequence: n * phi mod 1 is spread evenly over [0, 1) for consecutive n. */
const PHI = 0.6180339887498949;

/** Whether endpoint `n` never answers (holds the connection open) when `fraction` of them are silent. */
export function isSilent(n: number, fraction: number): boolean {
  if (fraction <= 0) return false;
  return (n * PHI) % 1 < fraction;
}

/** The endpoint numbers in 1..count that never answer. */
export function silentEndpoints(count: number, fraction: number): number[] {
  const out: number[] = [];
  if (fraction <= 0) return out;
  for (let n = 1; n <= count; n++) if (isSilent(n, fraction)) out.push(n);
  return out;
}

export function endpointUrl(n: number, ports: readonly number[]): string {
  return `http://127.0.0.1:${ports[n % ports.length] ?? 0}/e/${n}`;
}

/** `/e/<n>/ready` -> n; null for anything else. */
export function endpointOfPath(path: string): number | null {
  const m = /^\/e\/(\d{1,9})\/ready(?:\?.*)?$/.exec(path);
  return m?.[1] === undefined ? null : Number(m[1]);
}

/** What a fixture process reports for the period since its previous mark (`GET /mark` on its control port). */
export interface EndpointMark {
  /** probe requests received (answered, still waiting, or held) */
  readonly probes: number;
  /** distinct endpoints probed */
  readonly distinct: number;
  /** probes of an endpoint already probed in the same period */
  readonly duplicates: number;
  /** probes of silent endpoints (held open until the prober gives up) */
  readonly silentProbes: number;
  /** the most requests in flight at once (answering + held) */
  readonly maxInFlight: number;
  /** this process's CPU time in the period, ms (user + system) */
  readonly cpuMs: number;
  /** wall time of the period, ms */
  readonly wallMs: number;
  /** event-loop delay of the fixture in the period (ms): p99 and max; high means it could not keep up */
  readonly loopDelayP99Ms: number;
  readonly loopDelayMaxMs: number;
  /** answers sent later than the configured delay + 50 ms (the fixture, not the prober, was slow) */
  readonly lateAnswers: number;
  /** distinct endpoints ever probed since the last reset */
  readonly everProbed: number;
}
