import { spawn, type ChildProcess } from 'node:child_process';
import * as path from 'node:path';
import { repoRoot } from '../../src/util';

const FLEET = path.join(repoRoot(), 'bin', 'fleet.js');

/** A `fleet` command run as a process of its own on this test's Node, its stdout and stderr collected in one log. */
export class FleetProcess {
  readonly child: ChildProcess;
  /** its exit code (null when a signal ended it) */
  readonly exited: Promise<number | null>;
  private output = '';

  constructor(args: readonly string[], env: NodeJS.ProcessEnv) {
    this.child = spawn(process.execPath, [FLEET, ...args], { env, stdio: ['ignore', 'pipe', 'pipe'] });
    this.child.stdout?.on('data', (c: Buffer) => (this.output += c.toString()));
    this.child.stderr?.on('data', (c: Buffer) => (this.output += c.toString()));
    this.exited = new Promise((resolve) => this.child.on('exit', (code) => resolve(code)));
  }

  /** what it wrote so far, stdout and stderr interleaved as they came */
  get log(): string {
    return this.output;
  }
}
